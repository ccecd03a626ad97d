"""A timm model by name inside a fastai Learner: head, groups, freezing, LRs, loss and precision."""
