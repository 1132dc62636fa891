"""Lightning: the callback lives in the package (``pip install distckpt[lightning]``)."""

from distckpt.lightning import DistckptCallback  # noqa: F401  (Trainer(callbacks=[DistckptCallback(root, ...)]))
