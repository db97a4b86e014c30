"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3 and 10.4.1.1.4)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb_server.errors import BadRequestError
from dicomweb_server.rendered import negotiate_rendered, parse_render_params
from dicomweb_server.rendering import rendered_image, representative
from dicomweb_server.retrieve import locate, parse_frame_list
from dicomweb_server.routes.common import accept_of, services, uid_param

__all__ = ["retrieve_rendered", "retrieve_thumbnail"]


async def _image(request: Request, thumbnail: bool) -> Response:
    media = negotiate_rendered(accept_of(request))
    params = parse_render_params(request.query_params)
    p = request.path_params
    found = await locate(
        services(request),
        uid_param(request, "study"),
        uid_param(request, "series") if "series" in p else None,
        uid_param(request, "instance") if "instance" in p else None,
    )
    frame = 1
    if "frames" in p:
        frames = parse_frame_list(p["frames"])
        if len(frames) != 1:
            raise BadRequestError("a rendered frame resource names exactly one frame")
        frame = frames[0]
    inst = found[0] if "instance" in p else representative(found)
    animate = "instance" in p and "frames" not in p
    data = await rendered_image(services(request), inst, frame, params, media, thumbnail, animate)
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


async def retrieve_rendered(request: Request) -> Response:
    return await _image(request, thumbnail=False)


async def retrieve_thumbnail(request: Request) -> Response:
    return await _image(request, thumbnail=True)
