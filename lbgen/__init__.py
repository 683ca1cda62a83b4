"""lbgen: low-biased labelled image datasets from category names (lbGen, CVPR 2025) on Ray."""

__version__ = "0.1.0"
