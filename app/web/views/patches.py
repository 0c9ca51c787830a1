"""A patch: where it comes from, "more like this" (FAISS neighbours over the run's patch
features), and "translate across labels" (an interactive job, shown as a grid when ready)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from app.models import Image, MiningRun, Translation
from app.services.images import image_info
from app.services.patches import SIMILAR_K, crop_file, patch_info, similar_patches
from app.services.runs import NotFound
from app.services.translations import jobs_for, request_translation, translation_json, translation_key
from app.web.deps import CSRF, SessionDep, SettingsDep, is_htmx, redirect, render
from app.web.ids import QueryId
from app.web.views.images import CACHE_FOREVER
from app.web.views.runs import credit_for, load_run

router = APIRouter(tags=["patches"])


def load_patch(session, patch_id: int) -> dict:
    patch = patch_info(session, patch_id=patch_id)
    if patch is None:
        raise HTTPException(404, f"There is no patch {patch_id}.")
    return patch


def cached_translation(session, patch: dict) -> dict | None:
    """The translation already made (or being made) for this patch, if any."""
    model_id = session.scalar(select(MiningRun.model_id).where(MiningRun.id == patch["run"]))
    translation = session.scalar(
        select(Translation).where(Translation.model_id == model_id,
                                  Translation.image_id == patch["image"],
                                  Translation.settings_key == translation_key(patch["box"], {}))
        .order_by(Translation.id.desc()).limit(1))
    if translation is None:
        return None
    return translation_json(translation, jobs_for(session, [translation.id]).get(translation.id))


@router.get("/patches/{patch_id:int}",
            summary="A patch: its image, clusters, similar patches, translation")
def patch_page(request: Request, patch_id: int, session: SessionDep):
    patch = load_patch(session, patch_id)
    run = load_run(session, patch["run"])
    image = image_info(session, image_id=patch["image"])
    data = dict(patch, run=run, image=image, translation=cached_translation(session, patch))
    return render(request, "patch.html", {"data": data, "run": run, "credit": credit_for(run)})


@router.get("/patches/{patch_id:int}/similar",
            summary="More like this: the nearest patches by DIFT feature (cosine similarity)")
def similar(request: Request, patch_id: int, session: SessionDep, settings: SettingsDep,
            k: int = Query(SIMILAR_K, ge=1, le=200), label: QueryId = None):
    patch = load_patch(session, patch_id)
    found = similar_patches(settings, session, patch=patch, k=k, label_id=label)
    data = {"patch": patch_id, "label": label, "k": k, "similar": found}
    return render(request, "_similar.html", {"data": data, "patch": patch})


@router.get("/patches/{patch_id:int}/crop.png", summary="The patch's crop (PNG, made once)")
def crop(patch_id: int, session: SessionDep, settings: SettingsDep):
    path = crop_file(settings, session, patch_id=patch_id)
    if path is None:
        raise HTTPException(404, f"There is no patch {patch_id}.")
    return FileResponse(path, media_type="image/png", headers=CACHE_FOREVER)


@router.post("/patches/{patch_id:int}/translate", dependencies=CSRF,
             summary="Translate the patch's region into every label (an interactive job)")
def translate(request: Request, patch_id: int, session: SessionDep):
    try:
        translation, job_id = request_translation(session, patch_id=patch_id)
    except NotFound as error:
        raise HTTPException(404, str(error)) from None
    session.flush()
    if is_htmx(request):
        job = jobs_for(session, [translation.id]).get(translation.id) if job_id else None
        data = translation_json(translation, job)
        return render(request, "_translation.html", {"data": data, "translation": data})
    return redirect(request, f"/translations/{translation.id}",
                    data={"translation": translation.id, "job": job_id})


def load_translation(session, translation_id: int):
    """The translation row and its JSON (with its job's progress), or a 404."""
    translation = session.get(Translation, translation_id)
    if translation is None:
        raise HTTPException(404, f"There is no translation {translation_id}.")
    return translation, translation_json(translation,
                                         jobs_for(session, [translation.id]).get(translation.id))


@router.get("/translations/{translation_id:int}",
            summary="A translation: progress until ready, then the element in every label")
def translation_page(request: Request, translation_id: int, session: SessionDep):
    translation, data = load_translation(session, translation_id)
    patch = patch_info(session, patch_id=translation.patch_id) if translation.patch_id else None
    run = load_run(session, patch["run"]) if patch else None
    image = session.get(Image, translation.image_id)
    data["source"] = {"patch": patch, "image": image_info(session, image_id=image.id)}
    return render(request, "translation.html", {"data": data, "translation": data, "run": run,
                                                "credit": credit_for(run) if run else None})


@router.get("/translations/{translation_id:int}/panel",
            summary="The translation's progress or grid (polled by the page)")
def translation_panel(request: Request, translation_id: int, session: SessionDep):
    translation, data = load_translation(session, translation_id)
    return render(request, "_translation.html", {"data": data, "translation": data})
