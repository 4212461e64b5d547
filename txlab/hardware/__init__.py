"""Hardware profiles for the time model: the catalogue of named devices (vendors' data sheets), a user's YAML
profile, and the `local` profile `txlab calibrate` writes (txlab.timemodel.calibrate). No torch here: the
config layer checks `measure.hardware` with it before anything heavy loads."""

from txlab.hardware.profile import (
    LOCAL,
    Profile,
    ProfileError,
    by_device_name,
    check_spec,
    load_profile,
    local_path,
    names,
)

__all__ = [
    "LOCAL",
    "Profile",
    "ProfileError",
    "by_device_name",
    "check_spec",
    "load_profile",
    "local_path",
    "names",
]
