"""Results store: the record schema, and atomic Parquet/JSON files on local disk or S3."""

from pipeline.store.io import META_PREFIX, Store
from pipeline.store.schema import COLUMNS, RECORD_SCHEMA, records_to_table

__all__ = ["COLUMNS", "META_PREFIX", "RECORD_SCHEMA", "Store", "records_to_table"]
