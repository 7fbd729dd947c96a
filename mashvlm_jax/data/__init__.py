"""Data: the synthetic UNSCENE set, video decoding, TFDS builders and the Grain pipeline.

  synthetic.py   procedural action/scene clips (labels + rendering)
  tasks/         question formats (UNSCENE binary duals, open-ended, training mix, MVBench)
  video.py       PyAV decoding and VideoChat2 frame sampling
  annotations.py users' JSON annotations (VideoChat2-IT, MVBench, UNSCENE layouts)
  builders.py    TFDS ArrayRecord builders (synthetic_unscene, local_video_qa)
  tokenizer.py   HF tokenizer.json / SentencePiece / the synthetic word-level tokenizer
  chat.py        chat template, answer-only labels, truncation
  frames.py      resampling, resizing, random resized crop, flip
  registry.py    config -> builder, ensure_built, tokenizer
  pipeline.py    Grain iterators (batch contract) and evaluation records
"""
