"""Neural style transfer on the classifiers' parts: a frozen pretrained VGG's features measure
content and style (``loss``), a feed-forward network learns one style (``network``, ``train``,
Johnson et al. 2016), or one picture is optimised directly (``gatys``, Gatys et al. 2016); the
stylisation network is evaluated (``evaluate``), served (``serving``) and gated (``registry``)
like the classifiers. Never imports Prefect."""
