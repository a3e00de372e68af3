"""The caller's transcript: VAD segmentation (gateway side) and the ASR worker role.

Gateway side, light (numpy, soxr, onnxruntime; no torch): :mod:`service.asr.vad`,
:mod:`service.asr.segmenter`, :mod:`service.asr.client`. ASR worker side (``moshimoshi
asr``): :mod:`service.asr.backends`, :mod:`service.asr.batcher`, :mod:`service.asr.server`,
:mod:`service.asr.main`. Nothing here is imported by the package itself: each process
imports only its side.
"""
