"""Model side: volume assembly, preprocessing, the paper's network, training and evaluation."""
