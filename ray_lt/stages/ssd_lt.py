"""SSD-LT (Li, Wang, Wu, ICCV 2021): ``ssd_feature`` and ``ssd_distill`` (being written)."""
