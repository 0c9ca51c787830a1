"""Getting labeled images into diffmine: zips, folders, manifests and builtin datasets."""
from app.ingest.builtin import BUILTINS, TWEMOJI_CREDIT
from app.ingest.errors import IngestError
from app.ingest.service import IngestReport, ingest_dataset

__all__ = ["BUILTINS", "TWEMOJI_CREDIT", "IngestError", "IngestReport", "ingest_dataset"]
