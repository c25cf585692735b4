"""ControlNet (issue 27): models read from models/ControlNet, their architecture from the tensors."""
