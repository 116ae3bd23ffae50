"""PyTorch implementations of the rules, the per-environment gradient engines and the AND-mask optimizer step.

Submodules (imported lazily by the user; torch is an optional dependency):

- :mod:`.rules`          the aggregation rules of :mod:`hardtovary.reference.rules` on torch tensors;
- :mod:`.models`         the reference MLP as an ``nn.Sequential`` and the FastResNet of the CIFAR-10 experiment;
- :mod:`.env_gradients`  per-environment / per-example gradient engines (``pooled`` and ``per_env`` semantics);
- :mod:`.optim`          ``and_mask_backward``, ``make_optimizer`` and ``TemporalAndMaskAdam`` (Algorithm 1);
- :mod:`.distributed`    the rules over ``torch.distributed`` (environments sharded across ranks) and a DDP comm hook.
"""
