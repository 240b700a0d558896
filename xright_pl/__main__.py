from xright_pl.commands.cli import main

main()
