"""Getting labeled images into diffmine: zips, folders, manifests and builtin datasets."""
from app.ingest.builtin import BUILTINS, TWEMOJI_CREDIT
from app.ingest.errors import IngestError
from app.ingest.service import IngestReport, default_dataset_name, ingest_dataset

__all__ = ["BUILTINS", "TWEMOJI_CREDIT", "IngestError", "IngestReport", "default_dataset_name",
           "ingest_dataset"]
