"""End to end on a planted signal: train briefly, then typicality must point at the planted mark."""
from conftest import planted_dataset

from worker.engine.presets import FAST
from worker.engine.typicality import label_scores, typicality


def test_marked_images_are_most_typical_inside_the_mark(planted_model):
    images, conditions, masks = planted_dataset(16, seed=1)  # unseen images
    marked = conditions[:, 0] == 1
    result = typicality(planted_model, images[marked], conditions[marked], FAST, seed=0)
    inside = (result.maps * masks[marked]).sum(dim=(1, 2)) / masks[marked].sum(dim=(1, 2))
    outside = (result.maps * ~masks[marked]).sum(dim=(1, 2)) / (~masks[marked]).sum(dim=(1, 2))
    assert (inside > outside).all(), (inside, outside)
    assert inside.mean() > 3 * outside.mean()


def test_diffusion_classifier_margin_separates_the_labels(planted_model):
    # After 80 steps the argmin can still lean to one label for every image (the null/label
    # balance is not settled yet), but the margin L_plain - L_marked already ranks every marked
    # image above every plain one.
    images, conditions, _ = planted_dataset(16, seed=2)
    scores = label_scores(planted_model, images, FAST, seed=0)
    margin, stderr = scores.contrast(0, 1)
    marked = conditions[:, 0] == 1
    assert margin[marked].min() > margin[~marked].max()
    assert (stderr > 0).all()
