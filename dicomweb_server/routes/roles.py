"""The role each route of the URL table needs (auth.py)."""

from __future__ import annotations

__all__ = ["ROUTE_ROLES"]

# The role each route needs (auth.py); None: open to anyone. tests/test_auth.py checks that
# every route is listed.
ROUTE_ROLES: dict[str, str | None] = {
    "health": None,
    "openapi": None,
    "retrieve_capabilities": None,
    "apikey_list": "admin",
    "apikey_create": "admin",
    "apikey_revoke": "admin",
    "store_instances": "write",
    "store_study_instances": "write",
    **{
        name: "read"
        for name in (
            "landing_page", "service_root",
            "search_for_studies", "search_for_all_series", "search_for_all_instances",
            "search_for_series", "search_for_study_instances", "search_for_instances",
            "retrieve_study", "retrieve_study_metadata", "retrieve_series",
            "retrieve_series_metadata", "retrieve_instance", "retrieve_instance_metadata",
            "retrieve_instance_frames", "retrieve_bulkdata",
            "retrieve_study_bulkdata", "retrieve_series_bulkdata", "retrieve_instance_bulkdata",
            "retrieve_study_pixeldata", "retrieve_series_pixeldata", "retrieve_instance_pixeldata",
            "retrieve_rendered_study", "retrieve_rendered_series", "retrieve_rendered_instance",
            "retrieve_rendered_frames", "retrieve_study_thumbnail", "retrieve_series_thumbnail",
            "retrieve_instance_thumbnail", "retrieve_frame_thumbnail",
        )
    },
}  # fmt: skip
