"""Volumes: read a scan exactly as Slicer does, map its intensities, resample it to the cube, read ahead.

- :mod:`.volume`: the in-memory :class:`~.volume.Volume` and a lazy :class:`~.volume.VolumeRef`;
- :mod:`.readers`: what a user names (file, DICOM folder, ``file.npz#test_17``) to volume references;
- :mod:`.slicer_io`, :mod:`.dicom`, :mod:`.arrays`, :mod:`.headers`: the readers themselves;
- :mod:`.intensity`, :mod:`.resample`: presets and the isotropic cube (PyTorch, on the encoder's device);
- :mod:`.prefetch`: the next volumes read in threads or loader processes while the encoder works.

Nothing is imported here, so ``import RaptorExtension.volumes.readers`` never loads PyTorch.
"""
