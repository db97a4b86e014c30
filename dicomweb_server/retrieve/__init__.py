"""The WADO-RS pipelines: which bytes answer a retrieve request, as multipart parts.

Stored bytes are streamed by ranged reads of the blob (frame offsets recorded at ingest, so a
frame read never parses the file); conversions run in worker threads (transcode.py).

Submodules (import from the one that defines a name; nothing is re-exported here):

- `instances`: study, series and instance retrieval: the instances located, each sent as
  stored or converted to another transfer syntax into a scratch file (Part, PartLength).
- `frames`: frame retrieval: the frame list, the plan of a frames request, the frames as
  stored or converted one at a time through the frame cache; Sized, a frame or bulk data
  value readable by byte range, and the readers of stored ranges (encapsulated items).
- `pixeldata`: bulk data values: the Pixel Data of an encapsulated instance (its
  uncompressed value, decoded frame by frame, or its frames) and the value of one bulk data
  element.
"""
