"""The archive room: whole survey archives reprocessed on Dask distributed (``specserve
reprocess``), each worker running the embedded runtime. Needs the ``archive`` extra (dask
distributed, pyarrow)."""
