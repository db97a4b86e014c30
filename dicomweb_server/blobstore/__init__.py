"""Blob storage: the instances' files, written, hashed and read back. The only importer of
aiofiles.

    budget.py   DownloadBudget: the bytes download chunks hold in a process
                (DOWNLOAD_BUFFER_BUDGET_BYTES), and the size of each next chunk
    files.py    BlobStore and BlobWriter Protocols and their filesystem implementation
                (FileSystemBlobStore): server-generated keys, spool files written in worker
                threads, fsync + rename into place; scratch_file, and scratch_space (a
                full scratch filesystem as a 503 with Retry-After); placed_files, the
                listing of the blobs placed (`check`)
    lost.py     LostBlobError: an instance's file missing or shorter than the index
                recorded (a 500 saying so); RecordedBlob, what a read is told of the file
    hashing.py  DataSetHash: the duplicate check's digest of a data set (meta information and
                trailing padding left out); hash_file, data_set_sha256
    reading.py  stream_path: a blob streamed in chunks, read ahead of its sender within a
                process-wide budget; tune_allocator (glibc malloc thresholds for those chunks)
"""
