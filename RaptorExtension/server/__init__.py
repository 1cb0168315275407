"""The Raptor server: heavy work (embed, explain, fit, batch) in its own process, local or on a GPU machine.

Why a process and not a thread: Slicer's main thread keeps Python's GIL while
Qt's event loop idles, so a Python worker thread inside Slicer advances only
when the main thread happens to run Python (a ViT forward pass in such a
thread ran 33 times slower).  Slicer's own CLI modules and its deep-learning
extensions run heavy work in another process for the same reason.

- :mod:`.protocol`: the HTTP API's paths, job kinds and states, shared by both ends;
- :mod:`.client`: a standard-library HTTP client (no PyTorch, no FastAPI), used by the
  Slicer modules and by ``raptor ... --server``;
- :mod:`.launcher`: starts a local ``raptor serve`` for the Slicer modules and reuses it;
- :mod:`.app`, :mod:`.jobs`, :mod:`.uploads`, :mod:`.model_pool`, :mod:`.tasks`, :mod:`.serve`:
  the server itself (FastAPI + uvicorn), which imports the engine.

Nothing is imported here: the client side must stay free of the server's dependencies.
"""
