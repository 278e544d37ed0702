"""The model-repair wing: what the model repairs (``repair.methods.finetune``, ``mixft``, ``clp``,
``recompose``) share.

- :mod:`.trainable`: the adapter's network prepared for training (preprocessing with train-time
  augmentation, parameter blocks from input to head, frozen BatchNorm, LoRA);
- :mod:`.finetune`: the fine-tuning loop and the :class:`~.finetune.Budget`;
- :mod:`.masks`: where the object is (the mask sources: ``--masks``, CLIPSeg, Grad-CAM, the
  ``contrast`` prior);
- :mod:`.attribution`: Grad-CAM;
- :mod:`.generation`: image generators and prompts for counterfactual images;
- :mod:`.pixels`: model inputs <-> pixels and the small morphology the others share.
"""
