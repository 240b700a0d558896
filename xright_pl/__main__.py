from xright_pl.cli import main

main()
