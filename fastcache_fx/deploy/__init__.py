"""Deployment without Dynamo: ``export`` (AOTInductor package or split engines, ``export.py``), the
manifest both sides check (``manifest.py``), ``load_exported`` (``load.py``) and ``fastcache-fx
export`` (``cli.py``)."""
