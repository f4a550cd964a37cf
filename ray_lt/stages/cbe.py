"""Class-balanced experts (Sharma et al., GCPR 2020): expert, logits, calibration stages."""
