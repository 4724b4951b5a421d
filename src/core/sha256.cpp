// placeholder: replaced by the BlockManager work
