"""The applications on top of the core: the training program (``apps.train``), data sets
(``apps.data``), models, checkpoints (including the original project's formats), feature export,
the neighbour browser and few-shot evaluation of exported features, with their command lines.

They use the core only through its public API (``snca_ext``, ``snca_ext.distributed``) and import
their own libraries (torchvision, tqdm, scikit-learn, matplotlib, PIL) where they use them.
"""
