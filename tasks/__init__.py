"""The tasks QFLARE ships, each named ``tasks.<module>:task`` (see docs/tasks.md).

- ``tasks.digits:task``: the 64-64-10 MLP on scikit-learn's 8x8 digits (the default);
- ``tasks.digits_cnn:task``: a small CNN on the same images;
- ``tasks.breast_cancer:task``: a tabular MLP on the Wisconsin breast cancer set.

Tasks import only torch, numpy, scikit-learn and ``common``: no party, no broker.
"""
