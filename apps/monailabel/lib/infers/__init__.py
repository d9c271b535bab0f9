from .atlas_registration import AtlasRegistration, InvalidRequestError, majority_vote

__all__ = ["AtlasRegistration", "InvalidRequestError", "majority_vote"]
