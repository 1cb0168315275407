"""Probes: small models fitted on embeddings, their portable files, their metrics, and exact explanations.

- :mod:`.probe`: fitting and applying a probe; reading labels and embeddings;
- :mod:`.probe_file`: the ``.raptorprobe`` file (ZIP of JSON and ``.npy``, never pickle);
- :mod:`.metrics`: AUC, accuracy, r² and their plots;
- :mod:`.explain`: a linear probe's logit split over planes, slices and patches; :mod:`.figure` draws it.
"""
