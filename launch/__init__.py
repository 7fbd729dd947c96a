"""Launchers: XManager (``launch/xm_launch.py``) and gcloud TPU VMs (``launch/gcloud_tpu.py``).

Run them from the repository root: ``python -m launch.gcloud_tpu --help``. ``topology``
holds what both need to know about TPU slices and the checks made before anything is
created. Recipe: ``docs/launch.md``.
"""
