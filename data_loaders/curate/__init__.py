"""``lcv-data curate``: raw videos -> clean, annotated, balanced clips, a metadata table and shards.

One module per step, a driver that runs them resumably over files, and two engines (a local process
pool, Ray tasks on an existing cluster)::

    from data_loaders.curate import CurateConfig, curate
    summary = curate(CurateConfig(input="raw_videos/", out="curated/"))

Layout of ``out/``: ``metadata.parquet`` (one row per clip), ``shards/cluster-NNN/`` (WebDataset shards
+ ``index.json``, one set per content cluster), ``conf/data/curated.yaml`` (the mixture with the
per-cluster sampling weights), ``report.json`` (+ PNG histograms with ``report``), and ``work/`` (the
per-file results that make a rerun skip finished files). See ``data_loaders/README.md``.
This package imports OpenCV, PySceneDetect, pyarrow, scikit-learn and Ray only inside the steps.
"""

from data_loaders.curate.config import STEPS, CurateConfig
from data_loaders.curate.driver import curate

__all__ = ["STEPS", "CurateConfig", "curate"]
