"""The recipe's numbers as the paper and DESIGN.md give them, written out here once more.

A mutation audit changed each of these in the code and the suite still passed: the other tests take
their expected values from the same constants, or pass the settings explicitly.
"""

import inspect
import json

import numpy as np
import pytest
import torch
from torch import nn

from feature_files import clustered, feature_file, run


def test_knn_defaults_are_dinos_k_20_and_t_007(tmp_path):
    from retrieval.evaluate import evaluate_files
    from retrieval.knn import evaluate_knn, weighted_knn

    for function in (weighted_knn, evaluate_knn, evaluate_files):
        parameters = inspect.signature(function).parameters
        assert parameters["ks"].default == (20,) and parameters["temperature"].default == 0.07, function
    train = feature_file(tmp_path / "train.h5", *clustered(60))
    val = feature_file(tmp_path / "val.h5", *clustered(20, seed=1))
    report = json.loads(run("knn", "--train", train, "--val", val, "--json").output)
    assert report["temperature"] == 0.07 and [r["k"] for r in report["results"]] == [20]


def test_pretraining_presets_hold_the_papers_recipes():
    from simsiam.config import PretrainConfig, preset_config

    imagenet, cifar = preset_config("imagenet"), preset_config("cifar")
    assert (imagenet.arch, imagenet.lr, imagenet.wd, imagenet.momentum, imagenet.batch_size, imagenet.epochs) == \
        ("resnet50", 0.05, 1e-4, 0.9, 512, 100)
    assert (imagenet.crop_min_scale, imagenet.blur, imagenet.fix_pred_lr, imagenet.dim, imagenet.pred_dim,
            imagenet.proj_layers) == (0.2, True, True, 2048, 512, 3)
    assert (cifar.arch, cifar.cifar_stem, cifar.lr, cifar.wd, cifar.batch_size, cifar.epochs, cifar.image_size) == \
        ("resnet18", True, 0.03, 5e-4, 512, 800, 32)
    assert (cifar.crop_min_scale, cifar.blur, cifar.proj_layers, cifar.proj_hidden_dim) == (0.2, False, 2, 2048)
    monitor = PretrainConfig()
    assert (monitor.knn_k, monitor.knn_temperature) == (20, 0.07)


def test_the_optimizer_is_plain_sgd_with_the_recipes_momentum_and_decay_on_every_group():
    from simsiam.config import preset_config
    from simsiam.train import build_model, build_optimizer

    config = preset_config("cifar", arch="resnet18", dim=64, pred_dim=16, proj_hidden_dim=64)
    optimizer = build_optimizer(build_model(config), config)
    assert len(optimizer.param_groups) == 2 and [g["fix_lr"] for g in optimizer.param_groups] == [False, True]
    for group in optimizer.param_groups:
        assert (group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"]) == (0.9, 0, False, 5e-4)


def test_the_encoder_starts_with_the_last_bn_of_every_residual_block_at_zero():
    from simsiam.config import preset_config
    from simsiam.train import build_model
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for arch in ("resnet18", "resnet50"):
        model = build_model(preset_config("imagenet", arch=arch))
        blocks = [m for m in model.encoder.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert blocks and all(not (b.bn3 if isinstance(b, Bottleneck) else b.bn2).weight.any() for b in blocks)


def test_the_projector_and_predictor_are_the_official_layers_in_order():
    from simsiam.model import SimSiam
    from simsiam.backbones import build_resnet

    model = SimSiam(build_resnet("resnet18", num_classes=32), 32, 8, proj_layers=3)
    kinds = [type(m) for m in model.encoder.fc]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert not model.encoder.fc[-1].affine and not model.encoder.fc[-2].bias.requires_grad
    assert [type(m) for m in model.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_augmentation_strengths_are_moco_v2s():
    from simsiam import augment

    assert augment.JITTER_STRENGTH == (0.4, 0.4, 0.4, 0.1) and augment.BLUR_SIGMA == (0.1, 2.0)
    assert augment.CROP_RATIO == (3 / 4, 4 / 3)
    assert (augment.JITTER_P, augment.GRAYSCALE_P, augment.BLUR_P, augment.FLIP_P) == (0.8, 0.2, 0.5, 0.5)


def test_evaluation_normalises_with_imagenets_mean_and_std():
    from simsiam.augment import eval_transform

    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    out = eval_transform(16, None)(image)
    expected = [(200 / 255 - mean) / std for mean, std in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert out[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_a_query_in_the_database_is_not_one_of_its_own_relevant_images():
    from retrieval.metrics import retrieval_metrics

    database = np.array([0, 0, 1, 1, 1])  # the query (class 0) is row 0, left out of its results
    metrics = retrieval_metrics(np.array([0]), np.array([[0, 1, 1, 1]]), database, recall_ks=(1,), map_k=4,
                                self_in_database=True)
    assert metrics["mAP@4"] == 1.0  # its one other class-0 image first: AP over 1 relevant image, not 2
    alone = retrieval_metrics(np.array([2, 0]), np.array([[0, 0, 1, 1], [0, 1, 1, 1]]), np.array([0, 0, 1, 1, 2]),
                              recall_ks=(1,), map_k=4, self_in_database=[True, True])
    assert alone["queries_evaluated"] == 1  # class 2's only image is the query itself: nothing to find


def test_classes_the_reference_lacks_become_unlabelled_not_class_0():
    from retrieval.features import FeatureSet, labels_in_classes_of

    def features(classes, labels):
        return FeatureSet(np.ones((len(labels), 2), np.float32), np.array(labels), ["x"] * len(labels),
                          {"classes": classes}, "f.h5")

    assert labels_in_classes_of(features(["a", "z"], [0, 1]), features(["b", "a"], [0, 1])).tolist() == [1, -1]


def test_a_file_whose_labels_are_below_minus_1_is_refused(tmp_path):
    import h5py

    from retrieval.features import read_features
    from simsiam.errors import InputError

    path = feature_file(tmp_path / "f.h5", *clustered(10))
    with h5py.File(path, "r+") as f:
        f["labels"][3] = -2
    with pytest.raises(InputError, match="do not index its"):
        read_features(path)


def test_index_search_scores_are_cosines_whatever_the_query_vectors_scale(tmp_path):
    pytest.importorskip("faiss")
    database = feature_file(tmp_path / "db.h5", *clustered(40))
    queries, labels = clustered(5, seed=3)
    scaled = feature_file(tmp_path / "q.h5", 10 * queries, labels)
    assert run("index", database, "--out", tmp_path / "db.index", "--kind", "flat").exit_code == 0
    by_index = json.loads(run("search", tmp_path / "db.index", "--query-h5", scaled, "-k", "3", "--json").output)
    by_file = json.loads(run("search", database, "--query-h5", scaled, "-k", "3", "--json").output)
    scores = [n["score"] for q in by_index["queries"] for n in q["neighbours"]]
    assert max(scores) <= 1.0 + 1e-6
    assert scores == pytest.approx([n["score"] for q in by_file["queries"] for n in q["neighbours"]], abs=1e-5)


def test_the_library_search_refuses_more_neighbours_than_rows():
    from retrieval.neighbours import search
    from simsiam.errors import InputError

    database, _ = clustered(30)
    with pytest.raises(InputError, match="30"):
        search(database, database[:2], 31, backend="torch")
