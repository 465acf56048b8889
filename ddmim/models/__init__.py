"""The networks and what they compute: backbones, the DDMIM model, heads, losses, masks, the EMA teacher."""
