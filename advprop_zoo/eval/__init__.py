"""Evaluation: accuracy over a loader (clean, under attack, under a corruption), the datasets the paper
reports on, ImageNet-C's CE / mCE, the results file, and ``advprop-zoo eval`` itself."""
