"""The two ends of a job: input readers (JSONL / Parquet / OpenAI Batch lines -> Request) and the crash-safe,
resumable output sink (records -> JSONL / Parquet / OpenAI Batch output)."""
from bitnet_batch.io.readers import BadRecord, Request, count_records, read_requests
from bitnet_batch.io.writers import OutputSink

__all__ = ["BadRecord", "OutputSink", "Request", "count_records", "read_requests"]
