"""ckd-ehr: CKD-EHR (arXiv 2506.15118) on Ray, from MIMIC-III tables to a served student."""
__version__ = "0.1.0"
