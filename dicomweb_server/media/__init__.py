"""Media types and transfer syntaxes: what a request asks for and what answers it.

Submodules (import from the one that defines a name; nothing is re-exported here):

- `mediatypes`: media-type and transfer-syntax constants, MediaRange, parsing of Content-Type
  and Accept (RFC 9110 12.5.1) and of the `accept` and `charset` query parameters, the
  STOW-RS request's boundary and part type.
- `negotiate`: negotiation of instances, frames, bulk data and the DICOM data model (JSON or
  XML) with an Accept (PS3.18 8.7), the media types of frames (PS3.18 Table 8.7.3-2), and
  the JPEG process (transfer syntax) of a codestream a STOW-RS part sends as `image/jpeg`.
- `headers`: the other request fields that choose a response: Range (RFC 9110 14.2),
  If-None-Match (13.1.2) and Accept-Encoding (12.5.3).
- `part10`: where a Part-10 file's File Meta Information ends (PS3.10 7.1), and the VRs with
  a 4-byte explicit length (PS3.5 7.1.2).
"""
