"""Integrations of vlmkern's ops into other projects' trainers (APPLICATION floor).

* :mod:`vlmkern.integrations.open_clip_train`: TuneCLIP's (H)GCL loss inside
  open_clip's own trainer (``python -m vlmkern.integrations.open_clip_train``).

Like :mod:`vlmkern.app`, this package may import third-party trainers and the
application; the kernel library never imports it (docs/ARCHITECTURE.md).
"""
