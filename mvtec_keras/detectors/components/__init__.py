"""Components shared by the pretrained-feature detectors (Mahalanobis, SPADE, PaDiM, PatchCore), one idea
per module:

- :mod:`.backbone`: the backbone (a name or a ``keras.Model``), its saving inside the detector folder and
  its execution (eager, traced, over a ``tf.distribute`` strategy's replicas);
- :mod:`.feature_maps`: pooling, resizing and Gaussian blur of feature and anomaly maps;
- :mod:`.gaussian`: streaming Gaussian statistics, batched inverse, Ledoit-Wolf;
- :mod:`.nearest`: nearest neighbours in Keras ops with bounded memory;
- :mod:`.sampling`: seeded reservoir samples of a stream;
- :mod:`.coreset`: greedy (farthest-point) coreset selection.
"""
