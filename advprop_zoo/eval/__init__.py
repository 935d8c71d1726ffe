"""Evaluation: accuracy over a loader (clean, under attack, under a corruption), the datasets the paper
reports on and any timm dataset spec (``hfds/NAME``, ...), ImageNet-C's CE / mCE, the results file (and
timm validate.py's CSV), and ``advprop-zoo eval`` itself, which takes validate.py's flags with their meanings."""
