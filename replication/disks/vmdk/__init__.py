"""VMDK disks: descriptor + extents (hosted sparse, flat/VMFS, streamOptimized read-only).

Public entry points:

* :func:`open_vmdk` opens a descriptor file or a monolithic sparse file;
* :func:`create_vmdk` creates an empty disk (monolithicSparse, twoGbMaxExtentSparse,
  monolithicFlat, twoGbMaxExtentFlat or vmfs) and opens it writable.

Module map: ``descriptor`` (text), ``header`` (KDMV header + validation), ``sparse``
(grain tables, reads), ``allocate`` (crash-safe grain allocation), ``stream``
(compressed grains), ``flat`` (FLAT/VMFS/ZERO extents), ``chain`` (snapshot rules),
``disk`` (VmdkDisk), ``open``, ``create``, ``info`` (disk info).
"""

from __future__ import annotations

from .create import SUBFORMATS, create_vmdk
from .disk import VmdkDisk
from .open import open_vmdk

__all__ = ["SUBFORMATS", "VmdkDisk", "create_vmdk", "open_vmdk"]
