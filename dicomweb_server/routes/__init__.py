"""The complete PS3.18 URL table (under the DICOMweb root), readable top to bottom."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route, Router

from dicomweb_server.config import DICOMWEB_ROOT
from dicomweb_server.routes.admin import create_key, list_keys, revoke_key
from dicomweb_server.routes.common import not_found
from dicomweb_server.routes.info import (
    capabilities,
    health,
    landing_page,
    openapi_json,
    service_root,
)
from dicomweb_server.routes.qido import search_for_instances, search_for_series, search_for_studies
from dicomweb_server.routes.rendered import retrieve_rendered, retrieve_thumbnail
from dicomweb_server.routes.roles import ROUTE_ROLES
from dicomweb_server.routes.stow import store_instances
from dicomweb_server.routes.wado import (
    retrieve_bulkdata,
    retrieve_bulkdata_resource,
    retrieve_instance,
    retrieve_instance_frames,
    retrieve_instance_metadata,
    retrieve_pixeldata,
    retrieve_series,
    retrieve_series_metadata,
    retrieve_study,
    retrieve_study_metadata,
)

__all__ = ["ROUTES", "ROUTE_ROLES"]

_ST = "/studies/{study}"
_SE = _ST + "/series/{series}"
_IN = _SE + "/instances/{instance}"

ROUTES: list[BaseRoute] = [
    Route("/", landing_page, methods=["GET"], name="landing_page"),
    Route("/health", health, methods=["GET"], name="health"),
    Route("/openapi.json", openapi_json, methods=["GET"], name="openapi"),
    Route("/admin/apikeys", list_keys, methods=["GET"], name="apikey_list"),
    Route("/admin/apikeys", create_key, methods=["POST"], name="apikey_create"),
    Route("/admin/apikeys/{key_id}", revoke_key, methods=["DELETE"], name="apikey_revoke"),
    # The service root, with or without its trailing slash (only GET: a POST to the bare root
    # is no STOW, which is POST .../studies).
    Route(DICOMWEB_ROOT, service_root, methods=["GET"], name="service_root"),
    Route(DICOMWEB_ROOT + "/", service_root, methods=["GET"], name="service_root"),
    # Retrieve Capabilities (PS3.18 8.9): OPTIONS on the service's base URI, with or without
    # its trailing slash.
    Route(DICOMWEB_ROOT, capabilities, methods=["OPTIONS"], name="retrieve_capabilities"),
    Route(DICOMWEB_ROOT + "/", capabilities, methods=["OPTIONS"], name="retrieve_capabilities"),
    # A path under the root matching none of these: a JSON 404, never a redirect (common.not_found).
    Mount(DICOMWEB_ROOT, app=Router(redirect_slashes=False, default=not_found, routes=[
            # STOW-RS (PS3.18 10.5)
            Route("/studies", store_instances, methods=["POST"], name="store_instances"),
            Route(_ST, store_instances, methods=["POST"], name="store_study_instances"),
            # QIDO-RS (PS3.18 10.6)
            Route("/studies", search_for_studies, methods=["GET"], name="search_for_studies"),
            Route("/series", search_for_series, methods=["GET"], name="search_for_all_series"),
            Route("/instances", search_for_instances, methods=["GET"],
                  name="search_for_all_instances"),
            Route(_ST + "/series", search_for_series, methods=["GET"], name="search_for_series"),
            Route(_ST + "/instances", search_for_instances, methods=["GET"],
                  name="search_for_study_instances"),
            Route(_SE + "/instances", search_for_instances, methods=["GET"],
                  name="search_for_instances"),
            # WADO-RS (PS3.18 10.4)
            Route(_ST, retrieve_study, methods=["GET"], name="retrieve_study"),
            Route(_ST + "/metadata", retrieve_study_metadata, methods=["GET"],
                  name="retrieve_study_metadata"),
            Route(_SE, retrieve_series, methods=["GET"], name="retrieve_series"),
            Route(_SE + "/metadata", retrieve_series_metadata, methods=["GET"],
                  name="retrieve_series_metadata"),
            Route(_IN, retrieve_instance, methods=["GET"], name="retrieve_instance"),
            Route(_IN + "/metadata", retrieve_instance_metadata, methods=["GET"],
                  name="retrieve_instance_metadata"),
            Route(_IN + "/frames/{frames}", retrieve_instance_frames, methods=["GET"],
                  name="retrieve_instance_frames"),
            Route(_IN + "/bulk/{path:path}", retrieve_bulkdata, methods=["GET"],
                  name="retrieve_bulkdata"),
            # Bulkdata and Pixel Data resources (PS3.18 10.4.1.1.5, 10.4.1.1.6).
            Route(_ST + "/bulkdata", retrieve_bulkdata_resource, methods=["GET"],
                  name="retrieve_study_bulkdata"),
            Route(_SE + "/bulkdata", retrieve_bulkdata_resource, methods=["GET"],
                  name="retrieve_series_bulkdata"),
            Route(_IN + "/bulkdata", retrieve_bulkdata_resource, methods=["GET"],
                  name="retrieve_instance_bulkdata"),
            Route(_ST + "/pixeldata", retrieve_pixeldata, methods=["GET"],
                  name="retrieve_study_pixeldata"),
            Route(_SE + "/pixeldata", retrieve_pixeldata, methods=["GET"],
                  name="retrieve_series_pixeldata"),
            Route(_IN + "/pixeldata", retrieve_pixeldata, methods=["GET"],
                  name="retrieve_instance_pixeldata"),
            # Rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4); a study or
            # series is represented by one image (rendering.representative).
            Route(_ST + "/rendered", retrieve_rendered, methods=["GET"],
                  name="retrieve_rendered_study"),
            Route(_SE + "/rendered", retrieve_rendered, methods=["GET"],
                  name="retrieve_rendered_series"),
            Route(_IN + "/rendered", retrieve_rendered, methods=["GET"],
                  name="retrieve_rendered_instance"),
            Route(_IN + "/frames/{frames}/rendered", retrieve_rendered, methods=["GET"],
                  name="retrieve_rendered_frames"),
            Route(_ST + "/thumbnail", retrieve_thumbnail, methods=["GET"],
                  name="retrieve_study_thumbnail"),
            Route(_SE + "/thumbnail", retrieve_thumbnail, methods=["GET"],
                  name="retrieve_series_thumbnail"),
            Route(_IN + "/thumbnail", retrieve_thumbnail, methods=["GET"],
                  name="retrieve_instance_thumbnail"),
            Route(_IN + "/frames/{frames}/thumbnail", retrieve_thumbnail, methods=["GET"],
                  name="retrieve_frame_thumbnail"),
    ])),
]  # fmt: skip
