"""The Slicer modules' logic, with MRML but without Qt, so it is tested headless on real scenes.

- :mod:`.embed` (:class:`~.embed.EmbedLogic`), with :mod:`.embed_job`, :mod:`.choices`,
  :mod:`.provenance` and :mod:`.scene_embeddings`: the Raptor Embed module;
- :mod:`.probe` (:class:`~.probe.ProbeLogic`): the Raptor Probe module;
- :mod:`.batch` (:class:`~.batch.BatchLogic`): the Batch section over Slicer's DICOM database;
- :mod:`.node_attributes`: embeddings stored on volume nodes; :mod:`.dependencies`: first-use installs.

Nothing is imported here: a module's panel must build before PyTorch is installed.
"""
