"""Whole-CT inference (paper section III-B, test phase): tiles -> network -> votes -> decoder.

The paper crops the test CT into blocks, runs the network on each, and clusters with K-means
"the coordinates of the same type of vertebrae" to one centroid per type. The modules, in the
order data flows: :mod:`~vertstudy.infer.tiling` (steps 1-2), :mod:`~vertstudy.infer.votes`
(step 3 and the paper's K-means, step 4), :mod:`~vertstudy.infer.decoders` (step 4's
alternative, the default), :mod:`~vertstudy.infer.whole` (a whole case end to end, centroids
mapped back to the image), and on top of them :mod:`~vertstudy.infer.predict` (``vertstudy
predict``), :mod:`~vertstudy.infer.evaluate` (held-out scoring, the mean-position baseline) and
:mod:`~vertstudy.infer.diagnose` (where identification is lost). Here:

1. **Tiling** (:func:`vertstudy.infer.tiling.tile_origins`). The canonical volume (``(Z, Y, X)``, z-scored, isotropic,
   see :mod:`vertstudy.data.preprocess`) is covered by overlapping crops of the checkpoint's
   ``crop_size`` at ``stride`` voxels (a study or ``bench learn`` that leaves ``infer.stride``
   unset derives it as ``crop_size // infer.tiles_per_crop``, a quarter of the crop by default,
   so about 4 tiles per axis see each point; the whole-CT validations during training tile at
   half a crop, ``train.whole_ct_tiles_per_crop``). Along each axis the origins are ``0, s, 2s, ...`` and
   the last tile is flush with the end of the volume (origin ``n - c``), so every voxel lies
   in at least one tile. An axis shorter than the crop gets a single tile centred on it
   (origin ``-((c - n) // 2)``); the voxels outside the volume are the case's ``pad_value``
   (z-scored air), as in training crops that leave the volume. A stride larger than the crop
   would leave voxels unseen and is refused (``ConfigError``).

2. **Network** (:func:`vertstudy.infer.tiling.run_network`). Tiles that hold (almost) no body are skipped
   (``infer.skip_empty_tiles``: less than ``infer.body_fraction`` of their voxels above air).
   The others go through the model in batches of ``batch_size``
   under ``torch.inference_mode``; ``coords`` ``(B, 26, 3)`` are crop voxels ``(z, y, x)``,
   ``logits`` ``(B, 26)`` pre-sigmoid (or ``None`` for a localization-only model).

3. **Votes** (:func:`vertstudy.infer.votes.collect_votes`). In each tile, class ``n`` votes when its probability
   ``sigmoid(logit)`` is ``>= threshold`` **and** its coordinate lies inside the tile
   (``0 <= c < size`` on every axis, the rule by which training crops mark a class present).
   The vote is the point ``origin + c`` in canonical voxels, weighted by its probability, and
   carries its **centrality** in the tile (:func:`vertstudy.infer.votes.centrality`: 1 at the
   centre, towards 0 at a face, where an integral-regression coordinate is pulled inwards).
   A **localization-only** model (``logits is None``) has no classifier, so every class whose
   coordinate lies inside the tile votes with weight 1 — including the classes that are not
   in the tile at all, whose integral-regression coordinates still land somewhere inside it.
   Those false votes are why a loc-only model has a poor identification rate (paper table
   III: the classification branch "eliminates the false positives of localization").

4. **Decoding** (``infer.decoder``). ``kmeans``, the paper's: **clustering**
   (:func:`vertstudy.infer.votes.cluster_votes`), per class, on its votes ``(N, 3)`` with weights:

   - no vote: the class is not predicted;
   - one distinct point, or a cloud whose bounding-box diagonal is below ``merge_mm`` (no two
     K-means centres could be farther apart): one cluster, without running K-means;
   - else K-means with ``k = 2`` (scikit-learn, votes weighted by probability,
     ``n_init = 4``, ``random_state = 0``: deterministic). If the two weighted centres are
     closer than ``merge_mm`` (default 10 mm, about a third of a lumbar level; adjacent
     vertebrae are >= 15 mm apart) the two clusters are one scatter of the same vertebra and
     all votes are kept; else the cluster with the larger total weight (sum of
     probabilities; ties: more votes, then the first K-means label) is kept and the other is
     the **outlier cluster** (votes of tiles that mistook a neighbour for this class), dropped;
   - the kept cluster must hold at least ``min_votes`` votes, else the class is not
     predicted;
   - the centroid is the weighted mean of the kept votes: probability times centrality to the
     power ``infer.centre_weight`` (0: by probability alone, the K-means centre, the paper's).

   Each class is clustered independently, as in the paper: two classes may end up on the same
   vertebra (a shift like paper Fig. 9B); nothing in K-means enforces the order of the spine.
   ``sequence`` (the default, beyond the paper; :mod:`vertstudy.infer.decoders`) does: all
   votes become candidates and a dynamic programme picks at most one per class in anatomical
   order, with a spacing prior fitted on the training cases.

Everything but :func:`vertstudy.infer.tiling.run_network` (and the functions that call it) is a pure
numpy function.
"""
