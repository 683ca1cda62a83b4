"""Model factories: a name (builder, local path or hub id) in, a ready frozen model out."""

from lbgen.models.clip import Clip, create_clip
from lbgen.models.generator import create_generator
from lbgen.models.hub import ModelNotFoundError
from lbgen.models.iqa import Quality, create_iqa

__all__ = ["Clip", "Quality", "ModelNotFoundError", "create_clip", "create_generator", "create_iqa"]
