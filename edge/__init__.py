"""Edge deployment: the served release as ONNX files that run on a device without a server.

* :mod:`.onnx_export` — torch → ONNX for every part, int8 by onnxruntime's quantizer;
* :mod:`.release` — export, score through the bundle's own predictor, gate, register
  (``intent-edge``, alias ``edge``);
* :mod:`.bundle` — the bundle folder, its archive and the channel manifest devices poll;
* :mod:`.predictor` — what runs on the device (onnxruntime, numpy, tokenizers only), field
  updates with checksums and rollback;
* ``python -m edge export | bundle``.
"""
