"""MONAI Label app serving this bundle as atlas-based segmentation.

    monailabel start_server --app apps/monailabel --studies /path/to/images \
        [--conf atlas_dir /path/to/atlases] [--conf num_atlases 8] [--conf bundle_path /path/to/bundle]

One infer task, ``atlas_registration`` (segmentation): see ``lib/infers/atlas_registration.py``.
``--conf`` options:

- ``bundle_path``: the bundle folder (default: the folder two levels above this app, i.e. the bundle
  this app ships in).
- ``atlas_dir``: a Learn2Reg or MSD folder of labelled atlases (default: the bundle's
  ``sample_data/HippocampusMR``).
- ``num_atlases``: atlases used per request by default (default: all of them).

No trainer: the registration network is trained with the bundle's ``configs/train.json``, not from
MONAI Label. Bad requests (an image id not in the datastore, an image the task cannot use, a bad
parameter) get an HTTP 4xx answer whose ``detail`` says why; the server keeps serving.
"""

import json
import logging
import os

from fastapi import HTTPException
from lib.infers import AtlasRegistration, InvalidRequestError
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)

MODEL = "atlas_registration"


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        here = os.path.dirname(os.path.realpath(__file__))
        self.bundle_path = os.path.realpath(conf.get("bundle_path") or os.path.join(here, "..", ".."))
        with open(os.path.join(self.bundle_path, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"{metadata['name']}: atlas-based segmentation",
            description="Registers labelled atlases onto the image with the bundle's network and fuses their labels",
            version=metadata["version"],
        )

    def init_infers(self) -> dict[str, InferTask]:
        num_atlases = self.conf.get("num_atlases")
        task = AtlasRegistration(
            self.bundle_path,
            self.conf,
            atlas_dir=self.conf.get("atlas_dir") or None,
            num_atlases=int(num_atlases) if num_atlases else None,
        )
        logger.info(f"+++ Adding Inferer:: {MODEL} => {task}")
        return {MODEL: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with the request checked first and failures answered with a message.

        MONAI Label itself turns an unknown image id into an empty path and every exception into a
        bare "Internal Server Error"; here the client gets 404 / 400 / 500 with a ``detail``.
        """
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore if datastore else self.datastore()
            if not image or not store.get_image_uri(image):
                ids = store.list_images()
                shown = ", ".join(sorted(ids)[:10]) + (", ..." if len(ids) > 10 else "")
                raise HTTPException(
                    status_code=404, detail=f"image {image!r} is not in the datastore ({len(ids)} images: {shown})"
                )
        try:
            return super().infer(request, datastore)
        except InvalidRequestError as e:
            logger.warning(f"refused: {e}")
            raise HTTPException(status_code=400, detail=str(e)) from e
        except MONAILabelException as e:
            code = 400 if e.error == MONAILabelError.INVALID_INPUT else 500
            raise HTTPException(status_code=code, detail=f"{e.error.value}: {e.msg}") from e
        except HTTPException:
            raise
        except Exception as e:
            logger.exception("inference failed")
            raise HTTPException(status_code=500, detail=f"inference failed: {type(e).__name__}: {e}") from e
