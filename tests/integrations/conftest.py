from integrations._torchvision import make_importable

make_importable()
