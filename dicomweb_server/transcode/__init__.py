"""Decoding and re-encoding pixel data: the codec registry (STYLE.md rule 9).

With render.py, the pixel layer: the only modules importing numpy, Pillow, imagecodecs and
pydicom.pixels. Functions here are synchronous and CPU-bound; callers run them in worker threads
behind the app's CapacityLimiter (STYLE.md rule 8).

    codecs.py   transfer syntax constants, PixelInfo, the encoders (ENCODERS), what decodes
                (decodable, available_targets, missing_codec), keeps_ybr; TranscodeError
    plugins.py  pydicom's decoders called: the preferred plugin, then any (decoded); what a codec
                may raise (DECODE_ERRORS), a Rust codec's panic included (CodecPanicError)
    fallback.py libjpeg-turbo (imagecodecs) as pydicom's last JPEG decoding plugin, for the
                frames the others refuse (register_fallback, called by plugins.py)
    frames.py   frames decoded or re-encoded one at a time (frame_array, decode_frames,
                encode_frames, decode_codestream, convert_codestream), the decode size bound
                (DECODE_MAX_BYTES), files decoded whole kept (WHOLE_FILE_KEEP_MAX_BYTES);
                read_stored, pydicom's reading of a stored file (MAX_CONVERTED_SEQUENCE_DEPTH)
    fragments.py frames of encapsulated files ingest could not place (frame_map,
                stored_frames)
    inflated.py Deflated files inflated once into a scratch copy whose frames are read by
                offset, kept across requests (INFLATED_KEEP_BYTES) and held over one (hold)
    lossy.py    Lossy Image Compression: read from a stored codestream (lossy_method), written
                on a converted copy (mark_lossy)
    convert.py  whole instances converted: to_transfer_syntax (streamed to a file),
                converted_dataset (in memory), one_bit_pixel_data
    writable.py whether pydicom can write a data set little endian, checked before it does
                (check_writable)
    pixelwrite.py Pixel Data written a frame or a chunk at a time into a converted file
"""
