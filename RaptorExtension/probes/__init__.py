"""Probes: small models fitted on embeddings, their portable files, their metrics, and exact explanations.

- :mod:`.probe`: fitting and applying a probe; reading labels and embeddings;
- :mod:`.probe_file`: the ``.raptorprobe`` file (ZIP of JSON and ``.npy``, never pickle);
- :mod:`.metrics`: AUC, accuracy, r², Brier score, operating thresholds, sensitivity/specificity/PPV/NPV with
  bootstrap intervals, and their plots (ROC, reliability);
- :mod:`.calibration`: calibrated probabilities (scikit-learn's ``CalibratedClassifierCV``, stored as arrays);
- :mod:`.explain`: a linear probe's logit split over planes, slices and patches; :mod:`.figure` draws it.
"""
